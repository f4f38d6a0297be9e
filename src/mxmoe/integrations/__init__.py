"""Drop-ins for other libraries' models. Each submodule imports its library; this package
imports none of them (``import mxmoe.integrations.transformers`` needs ``transformers``)."""
