"""mmattn's version; setup.py reads it from here."""
__version__ = '0.1.0'
version_info = tuple(int(x) for x in __version__.split('.'))
