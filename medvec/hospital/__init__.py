"""What runs inside a hospital: read its own data, fine-tune the start point (optionally with DP-SGD), build and
encode its vector, compute BN moment sums, and check its data before joining.

Imports nothing from :mod:`medvec.coordinator`: only vectors and aggregates cross the line."""
