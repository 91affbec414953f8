"""nucflow's version, in a module of its own: every module may record it without importing the
package's face (:mod:`nucflow`), which imports the modules it hands names on from."""

__version__ = "0.1.0"
