"""The train stage's entry point inside a SageMaker Training job.

SageMaker's TensorFlow image runs this file (hyperparameter ``sagemaker_program``) from the top of
the job's code folder, ``sourcedir.tar.gz`` as ``detkit/cloud/training_job.py`` packs it, which
holds ``params.yaml``, ``conf/``, ``detkit/`` and ``stages/`` as the repository does. The job's
contract (``detkit/cloud/training_contract.py``) supplies the paths and params.
"""

import os
import sys
from pathlib import Path

# The code folder is the repository root of the job: params.yaml and conf/ are read from it.
os.environ["DVC_ROOT"] = str(Path(__file__).resolve().parent)

from stages.train import main  # noqa: E402  (after DVC_ROOT: the config is read relative to it)

# The toolkit's command-line copy of the hyperparameters is not read: the contract reads the file.
sys.exit(main([]))
