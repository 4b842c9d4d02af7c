// A mongosh script: the same shape of workload through the shell's own driver.
const d = db.getSiblingDB(DB_NAME);
d.shellthings.insertMany([...Array(7).keys()].map((i) => ({ _id: i, k: i % 2 })));
print(JSON.stringify(["count", d.shellthings.countDocuments({})]));
print(JSON.stringify(["cursor", d.shellthings.find().sort({ _id: 1 }).batchSize(2).toArray()]));
print(JSON.stringify(["aggregate", d.shellthings.aggregate([{ $group: { _id: "$k", n: { $sum: 1 } } }, { $sort: { _id: 1 } }]).toArray()]));
try {
  d.shellthings.insertOne({ _id: 1 });
  print(JSON.stringify(["duplicate", null]));
} catch (e) {
  print(JSON.stringify(["duplicate", e.code]));
}
