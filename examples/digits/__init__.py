"""The digits demo: scikit-learn's bundled 8x8 digits, federated across edge clients."""
