"""The `baton` command line."""

from __future__ import annotations

import argparse
import sys

from baton.engine import LLM, FieldError, SamplingParams


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _generate(args: argparse.Namespace) -> int:
    llm = LLM(args.model, dtype=args.dtype)
    for out in llm.stream(args.prompt, _params(args)):
        sys.stdout.write(out.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream the continuation of PROMPT to stdout")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--model", default="", help="HF checkpoint folder (default: the bundled stories260K)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    _sampling_args(gen)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FieldError as e:
        print(f"baton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
