"""Modules shipped in the data/ folder of the KNIME workflows, and the Python Script node scripts.

``twinvae_knime`` (the logic behind the nodes), ``twinvae_growth`` and ``twinvae_finetune`` import
nothing from twinvae, so they also run in a KNIME Python environment without twinvae installed;
the ONNX bundle runner they use is ``twinvae.runtime.twinvae_bundle``.
"""
