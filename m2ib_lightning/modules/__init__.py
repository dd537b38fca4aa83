"""The Lightning shell's modules, one file per kind of run: attribution (pairs and questions), evaluation, probing, and
the fits of the shipped models. Each takes its model (or adapter) injected; the engines they run are pure torch."""

from .attribution import AnswerM2IBModule, M2IBModule
from .evaluation import EvaluationModule
from .fitting import AnswerFit, ContrastiveCLIP, LlavaTraining, VQATraining, adamw_with_warmup_cosine
from .probing import VQAProbing

__all__ = ["AnswerFit", "AnswerM2IBModule", "ContrastiveCLIP", "EvaluationModule", "LlavaTraining", "M2IBModule",
           "VQAProbing", "VQATraining", "adamw_with_warmup_cosine"]
