"""Modules shipped in the data/ folder of the KNIME workflows, and the Python Script node scripts.

``twinvae_bundle`` (the ONNX bundle runner) and ``twinvae_growth`` import nothing from twinvae, so
they also run in a KNIME Python environment without twinvae installed.
"""
