"""The ``dni`` command: MKL's code path first (it needs a fresh process, before torch is
imported; see :mod:`dni.mkl_path`), then the CLI."""


def main() -> None:
    from dni import mkl_path

    mkl_path.reexec_if_wanted()
    from dni.cli import main as cli_main

    cli_main()
