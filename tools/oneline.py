"""
One line per bad flag, for every command of the project (torch-free, so that tools.plots can use it too).
"""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse with one line per bad flag, as every other input error here (docs/troubleshooting.md): the error
    and where the flags are listed, not argparse's full usage first. Exit code 2, as argparse's."""

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists every flag)\n")
