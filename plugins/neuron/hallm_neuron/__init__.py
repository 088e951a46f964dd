"""hallm-neuron: the hallm platform plugin for AWS Trainium and Inferentia (Neuron SDK).

The entry point (`hallm.platforms` -> `neuron`) is `hallm_neuron.plugin`, which imports no
torch. `NeuronPlatform` lives in `hallm_neuron.platform`.
"""

__version__ = "0.1.0"
