"""`meerkat bench guest`: the device policy measured against a foreground job (bench/guest/guest.py)."""
