"""Everything that runs the learners: configs, the device mesh and the compiled steps, replay on
the devices, checkpoints and pre-trained loading, logging and media, the two training loops and
the command line.
"""
