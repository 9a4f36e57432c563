// Stain normalisation (Macenko, Reinhard), uint8 RGB in and out.
#pragma once
