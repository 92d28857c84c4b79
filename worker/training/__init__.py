"""Training and evaluation of the paper's model; imports ``worker.method`` and ``worker.memory``.

``labels`` reads the labels CSV and makes the patient-level split, ``dataset`` turns DICOM studies
into cached network inputs with the paper's slice sampling, ``train`` runs the recipe (single
process or DistributedDataParallel under ``torchrun``), ``metrics`` holds the subject-level
statistics, ``evaluate`` scores studies and writes the report (``report``) and the plots
(``plots``), ``pointing`` plays the pointing game of the heat maps, ``hybrids`` reads a real series
with synthetic lesions inserted (``hrct-triage hybrids``), ``realism`` measures how real a series
looks, and ``bench`` times a training step for the model card.

Everything reuses the inference code (series selection, volume, lung slices, ``model_input``,
``forward``, ``study_probability``), so what is trained and measured here is what the gateway runs.
"""
