"""Pure tensor decompositions. Nothing here touches an ``nn.Module`` or does I/O."""
