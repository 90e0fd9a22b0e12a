"""Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    """Where pulled models, the jobs database and uploaded files live ($TUNESMITH_HOME)."""
    api_key: str | None
    """Key the server requires when set ($TUNESMITH_API_KEY)."""
    allowed_paths: tuple[Path, ...] = ()
    """Folders besides `home` whose models and adapters HTTP clients may name (--allow-path)."""
    python_graders: bool = False
    """Whether HTTP clients may run python graders (--allow-python-graders): their code runs
    without network and within CPU and memory limits, but can read what the server's user
    can read (docs/rft.md), so a server runs them only when its operator says so."""
    storage: str | None = None
    """A URI every node reads (s3://bucket/prefix, file:///shared; $TUNESMITH_STORAGE, --storage):
    uploads and published adapters go there too, so jobs workers need not share `home`."""

    def path_roots(self) -> tuple[Path, ...]:
        """Where paths that HTTP clients name must resolve: home, then the allowed folders."""
        return (self.home, *self.allowed_paths)

    @classmethod
    def from_env(cls) -> "Settings":
        home = os.environ.get("TUNESMITH_HOME") or str(Path.home() / ".cache" / "tunesmith")
        return cls(home=Path(home).expanduser(), api_key=os.environ.get("TUNESMITH_API_KEY") or None,
                   storage=os.environ.get("TUNESMITH_STORAGE") or None)
