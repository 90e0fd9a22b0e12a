"""Loading tokenizers from several threads of a fresh process (two jobs validating at once in
a new `tunesmith serve`): transformers 5 resolves its names lazily and raced there."""

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_first_tokenizer_loads_in_parallel_threads_all_succeed(tiny_model_dir):
    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(SRC)!r})
        from tunesmith.models.registry import load_tokenizer, resolve_model
        ref = resolve_model({str(tiny_model_dir)!r})
        errors, barrier = [], threading.Barrier(6)
        def load():
            barrier.wait()
            try:
                load_tokenizer(ref)
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=load) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("ERRORS", errors)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERRORS []" in out.stdout, out.stdout[-2000:]
