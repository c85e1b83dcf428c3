"""Sequence tasks built on the toolkit's layers: the embedded Reber grammar classifier
(:mod:`charrnn.tasks.reber`) and date conversion with encoder-decoders
(:mod:`charrnn.tasks.dates`); their command line is :mod:`charrnn.tasks.cli`."""
