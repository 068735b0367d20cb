"""resunet_jax: ResUNet detection and segmentation of lower-grade glioma in brain MRI."""
