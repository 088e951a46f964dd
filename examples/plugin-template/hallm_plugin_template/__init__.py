"""hallm-plugin-template: a complete hallm platform plugin to copy and adapt.

`plugin` holds the hook implementations the entry point names, `platform` the Platform,
`attention` the AttentionBackend. Everything runs on the host CPU through `hallm.ops.reference`,
so the template works out of the box and passes the same checks a real device must.
"""

__version__ = "0.1.0"
