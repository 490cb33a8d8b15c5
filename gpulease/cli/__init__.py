"""gpuctl: the command-line front end of the gpulease client (``gpulease.cli.main:main``)."""
