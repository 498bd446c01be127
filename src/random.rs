//! Cheap randomness for jitter and spreading choices (backoff, port picks): no security depends on it.

/// The clock's nanoseconds within the current second.
pub fn nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0)
}

/// A seed for jitter and random choices: the clock's nanoseconds mixed with `salt`.
pub fn seed(salt: u16) -> u64 {
    nanos() ^ (u64::from(salt) << 32)
}

/// One step of SplitMix64: spreads any seed (a counter, the clock) over all 64 bits.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
