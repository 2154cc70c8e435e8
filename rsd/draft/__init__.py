"""Draft model: proposes the main policy's coarse RFSQ layers from its hidden state, for speculative decoding."""
from rsd.draft.config import DraftConfig, DraftTrainConfig, VerifyConfig
from rsd.draft.model import RFSQDraftModelWithProjection, load_draft
from rsd.draft.samples import DraftSamples
from rsd.draft.train import train_draft
from rsd.draft.verify import DraftVerificationError, require_verified, verify_checkpoint

__all__ = ["DraftConfig", "DraftTrainConfig", "VerifyConfig", "RFSQDraftModelWithProjection", "load_draft",
           "DraftSamples", "train_draft", "DraftVerificationError", "require_verified", "verify_checkpoint"]
