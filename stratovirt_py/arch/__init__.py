"""Architecture-specific machine setup."""
