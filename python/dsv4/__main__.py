"""``python -m dsv4 ...`` (and ``torchrun --nproc-per-node N -m dsv4 generate ...``): the ``dsv4``
command line, :func:`dsv4.cli.main`."""

from dsv4.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
