"""Stages 1 and 2 of Screener: the descriptor and the masking-invariant condition model (dense SSL)."""
from nnscreener.planners.settings import ScreenerSettings
from nnscreener.ssl.augment import ColourJitterConfig
from nnscreener.ssl.losses import ssl_loss_of_block
from nnscreener.ssl.masking import BlockMasking
from nnscreener.ssl.objective import DenseSSLObjective
from nnscreener.training.data_loaders import CropPairLoader, multiprocess_loader
from nnscreener.training.networks import build_plans_unet
from nnscreener.training.stage_trainer import nnScreenerStageTrainer


class nnScreenerDescriptorTrainer(nnScreenerStageTrainer):
    """f_desc: the plans' UNet with a d_desc-channel full-resolution head, trained with dense VICReg/InfoNCE."""
    settings_block = 'ssl'
    feature_dim_key = 'descriptor_dim'
    # keys of the shared `ssl` block that only the condition model reads
    settings_not_learned = ('ssl.mask_block_size', 'ssl.mask_ratio', 'ssl.condition_num_steps', 'condition_dim')

    def build_objective(self):
        dim = getattr(self.settings, self.feature_dim_key)
        network = build_plans_unet(self.configuration_manager, dim)
        return DenseSSLObjective(network, ssl_loss_of_block(self.stage_settings, dim), self.build_masking(),
                                 ColourJitterConfig().scaled(self.stage_settings.colour_jitter_scale))

    def build_masking(self):
        return None

    def build_loader(self, seed: int, first_batch: int = 0):
        ssl = self.stage_settings
        batch_size = self.per_rank_batch_size(ssl.batch_size)
        pairs_per_image = ssl.positive_pairs // ssl.batch_size
        loader = CropPairLoader(self.screener_cache(), batch_size, self.configuration_manager.patch_size,
                                pairs_per_image, seed, first_batch)
        return multiprocess_loader(loader, pin_memory=self.device.type == 'cuda')


class nnScreenerConditionTrainer(nnScreenerDescriptorTrainer):
    """g_cond: same training plus random block masking, so its features ignore local (pathological) content."""
    feature_dim_key = 'condition_dim'
    settings_not_learned = ('descriptor_dim',)

    @classmethod
    def training_settings(cls, settings: ScreenerSettings) -> ScreenerSettings:
        steps = settings.ssl.condition_num_steps
        return settings if steps is None else settings.with_stage('ssl', num_steps=steps)

    def build_masking(self):
        return BlockMasking(self.stage_settings.mask_block_size, self.stage_settings.mask_ratio)
