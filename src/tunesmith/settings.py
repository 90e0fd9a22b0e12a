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

    def path_roots(self) -> tuple[Path, ...]:
        """Where paths that HTTP clients name must resolve: home, then the allowed folders."""
        return (self.home, *self.allowed_paths)

    @classmethod
    def from_env(cls) -> "Settings":
        home = os.environ.get("TUNESMITH_HOME") or str(Path.home() / ".cache" / "tunesmith")
        return cls(home=Path(home).expanduser(), api_key=os.environ.get("TUNESMITH_API_KEY") or None)
