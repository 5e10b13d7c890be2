"""Building blocks of the CCRk model: the Swin image encoder and the XLM-R text + fusion encoder."""
