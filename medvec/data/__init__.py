"""Image data as hospitals hold it: image sets, the sources they are read from (``.npz``, image folders, CSV
manifests, DICOM), and the simulator that shares one data set among hospitals.  Used by both sides."""
