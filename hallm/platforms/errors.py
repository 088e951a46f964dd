"""Errors shared by the core and plugins.

Every error a user can cause carries a message that says what was wrong and what to do.
"""

from __future__ import annotations


class HallmError(Exception):
    """Base class of every error hallm raises on purpose."""


class ConfigError(HallmError, ValueError):
    """A configuration value is invalid or unsupported on the chosen device."""


class DeviceSelectionError(HallmError):
    """The requested device cannot be used (unknown id, unavailable, plugin failed to load)."""


class PluginLoadError(DeviceSelectionError):
    """A plugin module could not be imported or registered."""


class PluginConflictError(DeviceSelectionError):
    """Two distributions claim the same device id."""


class PluginAPIVersionError(PluginLoadError):
    """A plugin targets a major version of the plugin API this core does not speak."""


class BackendSelectionError(ConfigError):
    """No attention backend can serve a layer; the message lists every candidate's reasons."""
