//! Who egtunnel runs as: the user name and home directories that defaults and ssh_config refer to.

use std::ffi::CStr;
use std::path::PathBuf;

pub struct Me {
    pub name: Option<String>,
    /// $HOME, else the password database's: egtunnel's own defaults (known_hosts, default keys).
    pub home: PathBuf,
    /// The password database's home, which `ssh` uses for `~` and `~/.ssh/config` whatever $HOME says.
    pub passwd_home: PathBuf,
}

pub fn current_user() -> Me {
    // The passwd entry is what OpenSSH uses; $HOME wins for the home directory so tests can relocate it.
    let mut name = None;
    let mut pw_home = None;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both live for the whole call; `result` is
    // either null or points at `pwd`, whose string fields point into `buf`.
    let rc = unsafe {
        libc::getpwuid_r(libc::geteuid(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result)
    };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success pw_name and pw_dir are NUL-terminated strings inside `buf`.
        unsafe {
            name = Some(CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned());
            pw_home = Some(PathBuf::from(CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned()));
        }
    }
    let name = name.or_else(|| std::env::var("USER").ok());
    let passwd_home = pw_home.clone().unwrap_or_else(|| PathBuf::from("/"));
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .or(pw_home)
        .unwrap_or_else(|| PathBuf::from("/"));
    Me { name, home, passwd_home }
}
