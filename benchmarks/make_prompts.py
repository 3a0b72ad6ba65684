"""Write prompts/code.jsonl: the default model's DEFAULT_PROMPTS, then held-out stdlib function headers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # the default model's trainer: a development tool, not part of lp

from lp.default_model import DEFAULT_PROMPTS  # noqa: E402
from train_default_model import function_headers, split_files, stdlib_files  # noqa: E402

OUT = Path(__file__).resolve().parent / "prompts" / "code.jsonl"


def _name(header: str) -> str:
    return header.split("(", 1)[0]


def main(extra: int = 7) -> None:
    records = [{"id": f"default-{i}", "prompt": p, "source": "lp.default_model.DEFAULT_PROMPTS"}
               for i, p in enumerate(DEFAULT_PROMPTS)]
    _, held = split_files(stdlib_files())
    seen = {_name(p) for p in DEFAULT_PROMPTS}
    for rel, header in function_headers(held, 100):
        if header.startswith("def ") and _name(header) not in seen and len(records) < len(DEFAULT_PROMPTS) + extra:
            records.append({"id": rel.replace("/", ".").removesuffix(".py"), "prompt": header,
                            "source": f"held-out stdlib file {rel}"})
            seen.add(_name(header))
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} prompts to {OUT}")


if __name__ == "__main__":
    main()
