"""Write docs/bad-inputs.md: every bad input the test suite feeds us, the error a user gets, and the test.

    python docs/bad_inputs.py          # rewrite the table
    python docs/bad_inputs.py --check  # fail if the table is out of date (tests/test_docs.py runs this)

The rows are read from the tests themselves (each ``pytest.raises(Error, match=...)``), so the table cannot
claim a check that does not exist. Grouped by the test file's area.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad-inputs.md"
AREAS = {
    "test_targets": "targets", "test_lora": "LoRA", "test_lora_init": "LoRA initialisations", "test_dora": "DoRA",
    "test_adapters": "bottleneck adapters", "test_compacter": "Compacter", "test_ia3": "(IA)3", "test_bitfit": "BitFit",
    "test_prompt_methods": "prompt methods", "test_llama_adapter": "LLaMA-Adapter", "test_quantization": "quantization",
    "test_quantized_loading": "quantization", "test_cpu_kernel": "quantization", "test_cli": "YAML / CLI",
    "test_param_groups": "learning-rate groups", "test_checkpoints": "checkpoints", "test_adapter_checkpoints": "checkpoints",
    "test_callback": "callback and exports", "test_export": "files", "test_export_writes": "files",
    "test_adapter_integrity": "files", "test_transactions": "files", "test_properties": "files",
    "test_distributed": "strategies", "test_fsdp1": "strategies", "test_fsdp2": "strategies", "test_deepspeed": "strategies",
    "test_data": "data", "test_transformers_compat": "models", "test_pruning": "pruning", "test_layerdrop": "LayerDrop",
    "test_composition": "composition", "test_sparse_ft": "sparse fine-tuning", "test_iti": "inference-time intervention", "test_inca": "InCA",
    "test_forgetting": "forgetting monitor", "test_spectrum": "weight spectrum", "test_linear_cross_entropy": "chunked loss",
    "test_packing": "packing", "test_compile": "compile",
}  # fmt: skip


def _text(node: ast.AST) -> str:
    try:
        value = ast.literal_eval(node)
        return value if isinstance(value, str) else ast.unparse(node)
    except (ValueError, SyntaxError):
        return ast.unparse(node)


def rows() -> list[tuple[str, str, str, str]]:
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]:
            what = function.name.removeprefix("test_").replace("_", " ")
            for compare in [n for n in ast.walk(function) if isinstance(n, ast.Compare)]:
                # The command line reports a bad config as exit status 2 with the cause on stderr's first line.
                if isinstance(compare.left, ast.Call) and ast.unparse(compare.left.func) == "main" and ast.unparse(compare.comparators[0]) == "2":
                    found.append((AREAS.get(path.stem, path.stem), what, "exit status 2; stderr's first line `error: <cause>`", f"`{path.name}::{function.name}`"))
            for call in [n for n in ast.walk(function) if isinstance(n, ast.Call)]:
                is_raises = ast.unparse(call.func) == "pytest.raises"
                if not is_raises or not call.args:
                    continue
                match = next((k.value for k in call.keywords if k.arg == "match"), None)
                if match is None:
                    continue
                found.append((AREAS.get(path.stem, path.stem), what, f"`{ast.unparse(call.args[0])}` matching `{_text(match)}`", f"`{path.name}::{function.name}`"))
    return found


def render() -> str:
    table = rows()
    lines = [
        "# Bad inputs and the errors they get",
        "",
        f"{len(table)} checks, generated from the test suite by `python docs/bad_inputs.py` (do not edit by hand). Each row",
        "is one `pytest.raises(..., match=...)` (or, for the command line, one exit-status-2 check of the first error line):",
        "the input the test builds, the exception and the message pattern a user",
        "sees, and the test. A failed call leaves the model and the files as they were (the tests check that too).",
        "",
        "| area | bad input (the test's name) | error | test |",
        "|---|---|---|---|",
    ]
    for area, what, error, test in sorted(table, key=lambda row: (row[0], row[3])):
        lines.append(f"| {area} | {what} | {error.replace('|', chr(92) + '|')} | {test} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TABLE.exists() or TABLE.read_text(encoding="utf-8") != text:
            print(f"{TABLE} is out of date: run python docs/bad_inputs.py", file=sys.stderr)
            return 1
        return 0
    TABLE.write_text(text, encoding="utf-8")
    print(f"wrote {TABLE} ({text.count(chr(10)) - 8} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
