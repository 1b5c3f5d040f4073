"""AWS: boto3 plumbing (``aws``), deploy, guarded updates, autoscaling, Batch Transform, SageMaker training jobs."""
