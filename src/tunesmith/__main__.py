"""`python -m tunesmith ...` runs the command line; the jobs worker starts training this way.

    python -m tunesmith --help
"""

from tunesmith.cli import main

main()
