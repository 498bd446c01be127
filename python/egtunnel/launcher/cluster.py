"""Optional cluster sessions in the kernel's namespace (EG's ``--cluster-type``): Spark or Dask."""

from __future__ import annotations

import atexit
import threading
from typing import Any, Callable, Optional

from .logs import log


class _LazySparkSession:
    """Creates the Spark session at most once, in whichever thread needs it first."""

    NAMES = ("spark", "sc", "sql")

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._namespace = namespace
        self._lock = threading.Lock()
        self._session: Any = None
        self._error: Optional[BaseException] = None
        self.placeholders = {name: _Deferred(name, self) for name in self.NAMES}

    def get(self) -> Any:
        with self._lock:
            if self._session is None and self._error is None:
                try:
                    from pyspark.sql import SparkSession

                    self._session = SparkSession.builder.getOrCreate()
                    atexit.register(self._session.stop)
                    log.info("Spark session created")
                except Exception as exc:
                    self._error = exc
                    log.exception("creating the Spark session failed")
                else:
                    real = {"spark": self._session, "sc": self._session.sparkContext, "sql": self._session.sql}
                    for name, value in real.items():
                        # A name the user has rebound meanwhile is theirs.
                        if self._namespace.get(name) is self.placeholders[name]:
                            self._namespace[name] = value
            if self._error is not None:
                raise RuntimeError(f"the Spark session could not be created: {self._error}") from self._error
            return self._session

    def resolve(self, name: str) -> Any:
        session = self.get()
        return {"spark": session, "sc": session.sparkContext, "sql": session.sql}[name]

    def create_in_background(self) -> None:
        threading.Thread(target=self._create_quietly, name="egtunnel-spark-init", daemon=True).start()

    def _create_quietly(self) -> None:
        try:
            self.get()
        except RuntimeError:
            pass  # already logged; each use of the names reports it

    def cancel_jobs(self) -> None:
        if self._session is not None:
            self._session.sparkContext.cancelAllJobs()


class _Deferred:
    """Stands in a kernel namespace for a Spark object until the session exists."""

    def __init__(self, name: str, owner: _LazySparkSession) -> None:
        self._name = name
        self._owner = owner

    def __getattr__(self, attribute: str) -> Any:
        # IPython probes objects for display hooks; those must not start a cluster session.
        if attribute.startswith("__") or attribute.startswith("_ipython_") or attribute.startswith("_repr_"):
            raise AttributeError(attribute)
        return getattr(self._owner.resolve(self._name), attribute)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._owner.resolve(self._name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._name}: the Spark session is created when first used>"


def init_cluster(cluster_type: str, spark_init_mode: str, namespace: dict[str, Any]) -> Optional[Callable[[], None]]:
    """Put the cluster handles into the kernel's namespace; returns a hook to run on interrupts."""
    if cluster_type == "spark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            log.warning("a Spark session was requested but pyspark is not installed; continuing without one")
            return None
        spark = _LazySparkSession(namespace)
        namespace.update(spark.placeholders)
        if spark_init_mode == "eager":
            spark.create_in_background()
        return spark.cancel_jobs
    if cluster_type == "dask":
        try:
            import dask_yarn

            namespace["cluster"] = dask_yarn.YarnCluster.from_current()
        except Exception as exc:
            log.warning("a Dask cluster was requested but could not be attached (%s); continuing without one", exc)
    return None
