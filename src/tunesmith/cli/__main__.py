"""`python -m tunesmith.cli ...`, which `train --nproc` runs under torch.distributed.

    python -m tunesmith.cli --help
"""

from tunesmith.cli import main

main()
