"""`python -m dashboard [--store URI] [streamlit options]`: start the viewer (`streamlit run dashboard/app.py`).

`--store` sets MICROSCOPE_STORE for the viewer's process, so the sidebar starts on that store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__)
    parser.add_argument("--store", help="a folder or s3://bucket/prefix (default: the settings' store)")
    args, rest = parser.parse_known_args(argv)
    if args.store:
        os.environ["MICROSCOPE_STORE"] = args.store
    from streamlit.web import cli as stcli

    sys.argv = ["streamlit", "run", str(APP), *rest]
    sys.exit(stcli.main())


if __name__ == "__main__":
    main()
