"""Test-wide settings: the command line's log file goes to a temporary folder, not ~/.cache."""
import os
import tempfile

os.environ.setdefault("TESSPHOT_LOG", os.path.join(tempfile.mkdtemp(prefix="tessphot-test-"),
                                                   "tessphot.log"))
