// Haraka's plugins/block_senders.js as a dovetail milter (docs/migrating-from-haraka.md).
import { defineMilter, reject } from 'dovetail';

export default function blockSenders(options) {
  const blocked = new Set((options?.domains ?? []).map((d) => d.toLowerCase()));
  return defineMilter({
    name: 'block-senders',
    async mail(_ctx, sender) {
      const host = sender.address.slice(sender.address.lastIndexOf('@') + 1).toLowerCase();
      if (sender.address !== '' && blocked.has(host)) {
        return reject(550, '5.7.1', `Mail from ${host} is not accepted here`);
      }
    },
    async eom(ctx) {
      ctx.message.addHeader('X-Block-Senders', 'checked');
    },
  });
}
