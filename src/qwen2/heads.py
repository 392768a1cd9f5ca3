"""Task heads on the Qwen2 decoder: sequence classification, token classification, extractive QA.

Same modules, state-dict names and losses as transformers' generic heads (modeling_layers.py, loss_utils.py):
`score` (no bias) on the last non-pad token, `score` (with bias) after dropout per token, and `qa_outputs` on a
base model stored as `transformer` for backward compatibility. Re-exported from qwen2.model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qwen2.cache import Cache
from qwen2.losses import cross_entropy, question_answering_loss, sequence_classification_loss
from qwen2.model import Qwen2Model, Qwen2PreTrainedModel, _pick_cache, _return_dict
from qwen2.outputs import QuestionAnsweringModelOutput, SequenceClassifierOutputWithPast, TokenClassifierOutput

logger = logging.getLogger(__name__)


class Qwen2ForSequenceClassification(Qwen2PreTrainedModel):
    loss_type = "ForSequenceClassification"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_pick_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        logits = self.score(outputs.last_hidden_state)
        batch = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch != 1:
            raise ValueError(
                "Cannot handle batch sizes > 1 if no padding token is defined: set config.pad_token_id so the "
                "last non-padding token of each row can be found."
            )
        if pad_token_id is None:
            last = -1
        elif input_ids is not None:
            # Rightmost non-pad token: works for left and right padding alike.
            not_pad = (input_ids != pad_token_id).to(logits.device, torch.int32)
            indices = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (indices * not_pad).argmax(-1)
        else:
            last = -1
            logger.warning("%s cannot detect padding in inputs_embeds; pooling the last position.", type(self).__name__)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()


class Qwen2ForTokenClassification(Qwen2PreTrainedModel):
    loss_type = "ForTokenClassification"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Qwen2Model(config)
        if getattr(config, "classifier_dropout", None) is not None:
            dropout = config.classifier_dropout
        elif getattr(config, "hidden_dropout", None) is not None:
            dropout = config.hidden_dropout
        else:
            dropout = 0.1
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput | tuple:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_pick_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            flat_labels = labels.view(-1).to(logits.device)
            loss = cross_entropy(logits.view(-1, self.config.num_labels).float(), flat_labels)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()


class Qwen2ForQuestionAnswering(Qwen2PreTrainedModel):
    base_model_prefix = "transformer"  # transformers keeps this older name for the QA head's base model
    loss_type = "ForQuestionAnswering"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.transformer = Qwen2Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> QuestionAnsweringModelOutput | tuple:
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_pick_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=kwargs.pop("use_cache", None),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(
                start_logits, end_logits, start_positions, end_positions, kwargs.get("num_items_in_batch")
            )
        output = QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()
