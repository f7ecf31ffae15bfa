"""KNIME workflows for twinvae: XMLConfig writer, workflow generator and the shipped node logic."""
