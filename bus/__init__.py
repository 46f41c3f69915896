"""bus: the model layer of bus-kernels (TSPS, PAD, timm drop-in, BUS vision-language model).

Not built yet (tracked as its own issue); it will call only the public ``bus_kernels`` API.
"""
