"""What runs at the coordinator: intake and the outlier screen, merge methods and the merge engine (BN plans, λ,
the gate), comparison rows, contribution scores, asynchronous steps, and rebuilding recorded merges.

Imports nothing from :mod:`medvec.hospital`: hospitals reach it only through what they publish."""
