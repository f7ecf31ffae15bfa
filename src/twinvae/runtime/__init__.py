"""Run exported bundles without torch: the bundle opener and the ONNX Runtime predictor.

``twinvae_bundle`` imports nothing from twinvae (numpy, onnxruntime, pyyaml, pillow and tifffile
only), so that the KNIME workflows can ship it as a single file next to their node scripts;
``twinvae predict``, ``evaluate``, ``validate``, ``transfer`` and ``knime build`` use the same
module.
"""
