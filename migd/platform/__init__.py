"""The emulated SEV platform: guest memory encryption, the PSP firmware, its sealed store, host identity and PKI."""
