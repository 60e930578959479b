"""The demo's simulation of a whole network on one machine (both sides in one process): the asynchronous clock,
the centralized and random-vector baselines, and the comparison report.  It uses both :mod:`medvec.hospital` and
:mod:`medvec.coordinator`, as only the layers above the two sides may."""
