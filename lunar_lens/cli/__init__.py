"""The `lunar-lens` command line: `main` (the console script) and one module per command, each imported
only when its command runs, so that `lunar-lens --help` answers at once. Nothing else in lunar_lens
knows of argparse: commands turn flags into the library's settings and parameters, and the library's
errors, which name parameters (`LunarError.parameters`), are shown with the flags that set them."""

from lunar_lens.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
