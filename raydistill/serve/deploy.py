"""The Serve app as an application builder, for ``serve run``, ``serve deploy`` and KubeRay's
``RayService`` (``cluster/kuberay/rayservice.yaml``), where Ray, not raydistill, starts the app:

    serve run raydistill.serve.deploy:app config=jobs/configs/demo_cpu.yaml

``raydistill serve CONFIG`` deploys the same application itself. The student is served when the
run's ``student/merged`` exists (a shared path on a cluster), else only ``teacher`` and ``base``.
"""

# No postponed annotations here: Serve reads the builder's parameter annotation as a class to
# validate its arguments with.
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from raydistill.config import load_config
from raydistill.serve.stage import application


class AppArgs(BaseModel):
    """``key=value`` arguments of ``serve run``, or ``args`` of the application in a Serve config."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(..., description="The pipeline YAML (as for every raydistill verb).")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. serve.num_replicas=2.")

    @field_validator("overrides", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        # `serve run ... overrides="a=1 b=2"` passes one string
        return value.split() if isinstance(value, str) else value


def app(args: AppArgs) -> Application:
    cfg = load_config(args.config, args.overrides)
    return application(cfg, require_student=False, with_base="base" in cfg.eval.systems)
