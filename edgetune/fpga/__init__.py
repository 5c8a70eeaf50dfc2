"""FPGA target: HLS C++ kernels (kernels/hls), their C simulation against the integer
golden model (kernels/fixed_point.py), memory images, and the HLS project export."""
